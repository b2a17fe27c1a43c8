"""The HTTP server of step 8: settings (the limits, typed once), the micro-batcher, the ASGI
middleware, the FastAPI app and the code that runs it under uvicorn.

Only `settings` is light to import; the others import mlx, FastAPI or uvicorn.
"""
