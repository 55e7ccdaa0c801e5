"""The auth service: API keys, JWT issuance and the JWKS (tokenmesh.auth.v1)."""
