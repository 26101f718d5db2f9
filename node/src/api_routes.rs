//! The API's route table. Every route is added through [`Routes`], which records its method
//! and path as it builds the axum router, so the list the OpenAPI test compares with the
//! document is, by construction, what the router serves.

use axum::handler::Handler;
use axum::http::Method;
use axum::Router;

pub struct Routes<S> {
    router: Router<S>,
    table: Vec<(Method, &'static str)>,
}

impl<S: Clone + Send + Sync + 'static> Default for Routes<S> {
    fn default() -> Self {
        Routes { router: Router::new(), table: Vec::new() }
    }
}

impl<S: Clone + Send + Sync + 'static> Routes<S> {
    pub fn new() -> Self {
        Routes::default()
    }

    fn add(mut self, method: Method, path: &'static str, route: axum::routing::MethodRouter<S>) -> Self {
        // axum merges method routers given for the same path (and panics on a repeated method).
        self.router = self.router.route(path, route);
        self.table.push((method, path));
        self
    }

    pub fn get<H: Handler<T, S>, T: 'static>(self, path: &'static str, h: H) -> Self {
        self.add(Method::GET, path, axum::routing::get(h))
    }

    pub fn post<H: Handler<T, S>, T: 'static>(self, path: &'static str, h: H) -> Self {
        self.add(Method::POST, path, axum::routing::post(h))
    }

    pub fn put<H: Handler<T, S>, T: 'static>(self, path: &'static str, h: H) -> Self {
        self.add(Method::PUT, path, axum::routing::put(h))
    }

    pub fn delete<H: Handler<T, S>, T: 'static>(self, path: &'static str, h: H) -> Self {
        self.add(Method::DELETE, path, axum::routing::delete(h))
    }

    pub fn merge(mut self, other: Routes<S>) -> Self {
        self.router = self.router.merge(other.router);
        self.table.extend(other.table);
        self
    }

    /// (method, path) of every route, paths in axum's (and OpenAPI's) `{param}` syntax.
    pub fn table(&self) -> &[(Method, &'static str)] {
        &self.table
    }

    pub fn into_router(self) -> Router<S> {
        self.router
    }
}
