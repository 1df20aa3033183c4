"""iotdlm.modes"""
