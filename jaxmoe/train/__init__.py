"""Training small Mixtral-architecture tenants on the Python standard library's text (jaxmoe-train)."""
