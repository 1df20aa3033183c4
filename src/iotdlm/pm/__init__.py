"""iotdlm.pm"""
