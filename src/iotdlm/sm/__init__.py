"""iotdlm.sm"""
