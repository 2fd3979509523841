"""Ray Serve application for bitlm: safety-gated HTTP inference (build_app in serve.app)."""
