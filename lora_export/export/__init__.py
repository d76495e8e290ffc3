"""Export to ONNX: tracing, ONNX files, adapters, quantized builds, PEFT in and out."""
