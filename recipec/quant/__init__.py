"""INT8 quantization: fake-quant of linear layers (QAT and PTQ), its state and its file format."""
