"""Rank analysis of adapters (docs/method.md §8), torch-free except ``analyze_model``: the report
(``report``) and its figures (``plots``, matplotlib)."""

from .report import AnalysisReport, ModuleReport, analyze, analyze_factors, analyze_model

__all__ = ["AnalysisReport", "ModuleReport", "analyze", "analyze_factors", "analyze_model"]
