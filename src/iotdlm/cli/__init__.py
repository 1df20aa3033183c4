"""iotdlm.cli"""
