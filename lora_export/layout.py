"""Where lora-export writes: every default output name, and the two forms of an export."""

from __future__ import annotations
