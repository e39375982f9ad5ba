"""Rank analysis of adapters (docs/method.md §8), torch-free except ``analyze_model``: reading adapter
directories and bundles (``read``), the report (``report``) and its figures (``plots``, matplotlib)."""

from .read import _Module as _Module  # the input type of analyze_factors
from .report import AnalysisReport, ModuleReport, analyze, analyze_factors, analyze_model

__all__ = ["AnalysisReport", "ModuleReport", "analyze", "analyze_factors", "analyze_model"]
