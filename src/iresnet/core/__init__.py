"""iresnet.core"""
