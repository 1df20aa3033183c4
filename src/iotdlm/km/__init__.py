"""iotdlm.km"""
