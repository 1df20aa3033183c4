"""iotdlm.store"""
