"""iotdlm.repository"""
