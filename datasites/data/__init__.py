"""fedmtl.datasites.data: the owner's records: reading and checking them against the schema,
inferring a schema, the mock data published beside them, and the demo cohort."""
