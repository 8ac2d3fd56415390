// Renders the registry's API catalogue with the vendored Swagger UI. A
// registry admin token set in the console (same tab) is sent along, for a
// registry whose listing needs one.
"use strict";

document.addEventListener("DOMContentLoaded", () => {
  const token = sessionStorage.getItem("plugin-host-admin-token");
  window.ui = SwaggerUIBundle({
    url: "/api/registry/openapi.json",
    dom_id: "#swagger-ui",
    deepLinking: true,
    requestInterceptor: (request) => {
      if (token && request.url.endsWith("/api/registry/openapi.json")) {
        request.headers.Authorization = "Bearer " + token;
      }
      return request;
    },
  });
});
