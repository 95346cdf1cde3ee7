"""Everything that formats output: console (rich), JSON, JUnit. Nothing else prints."""
