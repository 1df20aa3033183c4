"""iotdlm.pki"""
