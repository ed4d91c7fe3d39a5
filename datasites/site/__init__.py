"""fedmtl.datasites.site: this datasite's home folder, its identity keys and the syft gateway
(the only place that imports syft's client side lazily)."""
