"""ASGI: the state machines shared by every protocol, and the embedding API."""


def __getattr__(name: str):
    # Imported lazily: the server pulls in the protocols, which import this package.
    if name == "ASGIServer":
        from ..embed import ASGIServer

        return ASGIServer
    raise AttributeError(name)


__all__ = ["ASGIServer"]
