"""iotdlm.device"""
