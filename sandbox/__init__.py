"""Local stand-in for the AI/ML API text-to-video endpoints (alibaba/wan2.1-t2v-turbo).

    from sandbox import SandboxServer, SandboxConfig
    with SandboxServer(SandboxConfig(time_scale=90)) as srv:
        ...  # point the client at srv.url with api key "sandbox-key"
"""

from sandbox.config import SandboxConfig
from sandbox.server import SandboxServer

__all__ = ["SandboxConfig", "SandboxServer"]
