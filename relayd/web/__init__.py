"""The browser client relayd serves under ``/app/`` (``http.serve_app``): ``index.html``, the
page's script and style, and ``relayd.js``, a dependency-free ES module any page may use."""
