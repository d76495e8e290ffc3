"""Command line: ``lora-train pretrain|adapt`` (``cli.train_commands``) and ``lora-export [export|adapter|check|
validate|generate|from-peft|to-peft|compare-reports]`` (``cli.export_commands``); what they share (error handling,
options) in ``cli.options``.

The commands only parse options, call the library (:mod:`lora_export.train`, :mod:`lora_export.pipeline` for the
export and validation pipelines, :mod:`lora_export.export`, :mod:`lora_export.genai`) and print. Bad input (a
missing or unreadable file, a bad checkpoint, an impossible setting, an output that would replace an input) prints
one line ``error: ...`` to stderr and exits with status 2, like click's own usage errors; never a traceback. Every
output and option is checked before any work starts. An interrupt (Ctrl-C) prints ``error: interrupted`` and exits
with 130, leaving no partial file (writes are staged, see ``lora_export.files``).
"""

from . import serve_commands, web_commands  # noqa: F401  (register `lora-export serve` / `web` on export_cli)
from .export_commands import export_cli
from .train_commands import train_cli

__all__ = ["export_cli", "train_cli"]
