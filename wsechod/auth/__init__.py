"""Who a client is and what it may do: signed tokens (JWT, through PyJWT) with channel
rights, and the API keys of backends. Nothing here is hand-written cryptography: keys
are parsed by ``cryptography``, tokens checked by PyJWT, keys compared with
``hmac.compare_digest``."""
