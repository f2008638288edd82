"""CPU runtimes and the latency benchmark: onnxruntime, DeepSparse (own venv), torch-csr."""
