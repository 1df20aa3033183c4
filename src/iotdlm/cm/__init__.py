"""iotdlm.cm"""
