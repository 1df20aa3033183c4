"""iotdlm.transfer"""
