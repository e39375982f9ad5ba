"""Formats for other programs (torch): the runtime bundle (``bundle``) and standard PEFT LoRA
directories, both ways (``peft``). Not named ``export``: importing a package of that name would
shadow the function ``bl.export``."""
