"""The bundled recipe library (YAML files shipped as package data of ``recipec.recipes``)."""
