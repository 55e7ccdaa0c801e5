"""The `tokenmesh` operator CLI."""
