//! `/openapi.json`: the API described from the same types and handlers
//! that serve it.

use axum::response::IntoResponse;
use utoipa::OpenApi;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};

/// The OpenAPI document of the API.
#[derive(Debug, OpenApi)]
#[openapi(
    info(title = "deployd", description = "Deploys, rolls back and reports on the apps of one Docker host."),
    paths(
        super::deployments::create, super::deployments::list, super::deployments::get,
        super::deployments::notifications,
        super::events::stream,
        super::apps::status, super::apps::rollback, super::apps::lock, super::apps::unlock,
        super::apps::prepare, super::apps::canary,
        super::plans::create, super::plans::get, super::runs::create, super::logs::stream,
        super::whoami, super::health::healthz, super::health::readiness,
    ),
    components(schemas(deployd_proto::DeploymentEvent, deployd_proto::RunEvent, deployd_proto::LogEvent)),
    modifiers(&BearerAuth, &CommonErrors),
)]
pub struct ApiDoc;

struct BearerAuth;

/// Answers any `/v1` operation may give, whatever the handler: refused
/// tokens, too many failures, an overloaded agent or an unwritable audit
/// log; and for those with a body, its size, type and shape.
struct CommonErrors;

impl utoipa::Modify for CommonErrors {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::{ContentBuilder, RefOr, ResponseBuilder};
        let error = |description: &str| {
            let content = ContentBuilder::new()
                .schema(Some(utoipa::openapi::Ref::from_schema_name("ErrorBody")))
                .build();
            RefOr::T(
                ResponseBuilder::new()
                    .description(description)
                    .content("application/json", content)
                    .build(),
            )
        };
        for (path, item) in openapi.paths.paths.iter_mut() {
            if !path.starts_with("/v1/") {
                continue;
            }
            let operations = [
                (&mut item.get, false),
                (&mut item.post, true),
                (&mut item.put, true),
                (&mut item.delete, false),
            ];
            for (operation, has_body) in operations {
                let Some(operation) = operation else { continue };
                let responses = &mut operation.responses.responses;
                let mut add = |status: &str, description: &str| {
                    responses
                        .entry(status.to_owned())
                        .or_insert_with(|| error(description));
                };
                add("400", "A bad request (query, Last-Event-ID)");
                add("401", "No token, or a token refused");
                add("429", "Too many failed authentications from this address");
                add(
                    "503",
                    "The agent is overloaded, timed out, or cannot write its audit log",
                );
                if has_body {
                    add("413", "The body is larger than 16 KiB");
                    add("415", "The body is not JSON");
                    add("422", "The JSON does not have the expected shape");
                }
            }
        }
    }
}

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .build(),
            ),
        );
    }
}

/// Serves the document.
pub async fn document() -> impl IntoResponse {
    axum::Json(ApiDoc::openapi())
}
