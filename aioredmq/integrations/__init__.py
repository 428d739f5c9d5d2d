"""Web framework integrations: ``aioredmq.integrations.fastapi`` (FastAPI and Starlette)
and ``aioredmq.integrations.aiohttp``. Each needs its framework installed
(``pip install 'aioredmq[fastapi]'`` or ``'aioredmq[aiohttp]'``)."""
