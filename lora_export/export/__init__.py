"""Export to ONNX: tracing (``tracing``), the steps every export shares (``core``), the scoring graph and adapter
files of other checkpoints (``convert``), ONNX files and metadata (``onnx_files``), onnxslim (``simplify``), adapters
(``adapters``), quantized builds (``quantize``), PEFT in and out (``peft``), the quiet ORT session (``ort_session``)."""
