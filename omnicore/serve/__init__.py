"""``omni serve``: an OpenAI-compatible HTTP server with continuous batching, and a page to try a model.

scheduler.py / pool.py: the background thread and the slot pools it batches (torch only); app.py: the FastAPI
application (protocol.py checks request bodies, text.py assembles answers, metrics.py counts); server.py runs it.
Needs the ``serve`` extra (fastapi, uvicorn, prometheus-client); the scheduler itself needs only torch.
"""
