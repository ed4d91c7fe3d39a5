"""fedmtl.researcher"""
