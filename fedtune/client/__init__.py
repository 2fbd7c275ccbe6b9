"""The client side: what a strategy sees during a local update (ClientContext), the runtime that hosts
clients on a device's one resident model (ClientRuntime) and the per-client state store (ClientStore)."""
