//! `/ui`: the dashboard, a static page whose script polls this agent's own API. The page,
//! script and style are separate files in the binary so the Content-Security-Policy can
//! forbid every inline script and style, and every origin but this one.

use axum::http::header;
use axum::response::{IntoResponse, Response};

use crate::agent::AgentHandle;
use crate::api_routes::Routes;

const PAGE: &str = include_str!("ui/index.html");
const SCRIPT: &str = include_str!("ui/app.js");
const STYLE: &str = include_str!("ui/app.css");

/// Same-origin script, style and fetches only; no framing, no plugins, no forms elsewhere.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
                       img-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

pub fn routes() -> Routes<AgentHandle> {
    Routes::new()
        .get("/ui", || async { asset("text/html; charset=utf-8", PAGE) })
        .get("/ui/app.js", || async { asset("text/javascript; charset=utf-8", SCRIPT) })
        .get("/ui/app.css", || async { asset("text/css; charset=utf-8", STYLE) })
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::X_FRAME_OPTIONS, "DENY"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_has_no_inline_code_and_loads_only_its_own_assets() {
        // The CSP forbids inline code: any inline script, handler or style would be dead.
        for bad in ["<script>", "onclick=", "onload=", "style=", "<style", "javascript:"] {
            assert!(!PAGE.contains(bad), "index.html holds inline code: {bad}");
        }
        assert!(PAGE.contains("src=\"/ui/app.js\"") && PAGE.contains("href=\"/ui/app.css\""));
        // The SVG namespace is a name, not an address: the script may name it and nothing else.
        let script = SCRIPT.replace("\"http://www.w3.org/2000/svg\"", "SVG_NS");
        for far in ["http://", "https://", "//cdn"] {
            assert!(!PAGE.contains(far) && !script.contains(far) && !STYLE.contains(far), "{far} in an asset");
        }
        // Cluster data is rendered as text, never parsed as markup.
        assert!(!SCRIPT.contains("innerHTML") && !SCRIPT.contains("outerHTML") && !SCRIPT.contains("eval("));
        assert!(SCRIPT.contains("sessionStorage") && !SCRIPT.contains("localStorage"));
    }

    #[test]
    fn assets_carry_the_csp_and_frame_denial() {
        let r = asset("text/html; charset=utf-8", PAGE);
        assert_eq!(r.headers()[header::CONTENT_SECURITY_POLICY], CSP);
        assert_eq!(r.headers()[header::X_FRAME_OPTIONS], "DENY");
        assert!(CSP.contains("default-src 'none'") && !CSP.contains("unsafe-inline"));
    }
}
