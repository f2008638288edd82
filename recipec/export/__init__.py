"""Export of sparse checkpoints to verified, masked ONNX deployment folders."""
