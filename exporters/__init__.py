"""Exporters and CPU runtimes (installed as ``recipec.exporters``)."""
