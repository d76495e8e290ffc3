"""Reports: rendering parity results and comparing two reports."""
