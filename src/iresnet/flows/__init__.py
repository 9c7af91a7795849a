"""iresnet.flows"""
