"""fedmtl.privacy"""
