"""The browser as an edge device: a static page (``index.html`` + ``decoder.js``, no build step) that runs a genai
decoder directory with onnxruntime-web, written beside the model and served on 127.0.0.1 (``web.page``,
``lora-export web DIR``).

onnxruntime-web itself is not in the Python package: ``npm ci --prefix lora_export/web`` installs the version pinned
by ``package.json`` / ``package-lock.json`` here (``.ci/run`` does), and the page gets a copy of the three files it
loads.
"""
