"""iresnet.report"""
