"""The usage service: rate limits, token budgets, metering and reports (tokenmesh.usage.v1)."""
