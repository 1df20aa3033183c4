"""iotdlm.wire"""
