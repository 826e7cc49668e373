//! The OpenAPI 3.1 document of the JSON door, served at `/openapi.json`.
//!
//! It is derived, once, from what the door actually serves: the paths from its route table, the
//! schemas from the protobuf descriptors compiled into quotad (the same ones the JSON mapping is
//! generated from), the descriptions from the comments in `proto/`. So it cannot drift from the
//! door; a test calls every route it lists, and a contract fuzz checks answers against it.
//!
//! The schemas say what quotad sends, in the proto3 JSON mapping as generated: lowerCamelCase
//! names, every scalar field present (defaults included; an unset message field is left out),
//! 64-bit integers as decimal strings, enums by name, timestamps as RFC 3339 strings. quotad also accepts the original field names,
//! numbers for 64-bit integers and enum numbers, as the mapping requires of parsers.

use std::collections::HashMap;
use std::sync::LazyLock;

use prost::Message;
use prost_types::field_descriptor_proto::{Label, Type};
use prost_types::{DescriptorProto, EnumDescriptorProto, FileDescriptorProto};
use serde_json::{Map, Value, json};

use super::json::{OPENAPI_PATH, PACKAGE, ROUTES, code_name};
use super::pb;

/// The document, as served.
pub fn document() -> &'static [u8] {
    static DOCUMENT: LazyLock<Vec<u8>> = LazyLock::new(|| {
        serde_json::to_vec_pretty(&build()).expect("a JSON value always serializes")
    });
    &DOCUMENT
}

/// The document as a JSON value.
pub fn build() -> Value {
    let set = prost_types::FileDescriptorSet::decode(pb::FILE_DESCRIPTOR_SET)
        .expect("the compiled-in descriptors decode");
    let file = set
        .file
        .iter()
        .find(|f| f.package() == PACKAGE)
        .expect("the descriptors hold quota.v1");
    let comments = Comments::of(file);
    let mut schemas = Map::new();
    for (index, message) in file.message_type.iter().enumerate() {
        message_schemas(
            message,
            PACKAGE,
            &[4, index as i32],
            &comments,
            &mut schemas,
        );
    }
    for (index, kind) in file.enum_type.iter().enumerate() {
        schemas.insert(
            format!("{PACKAGE}.{}", kind.name()),
            enum_schema(kind, comments.get(&[5, index as i32])),
        );
    }
    schemas.insert("Error".into(), error_schema());

    let mut paths = Map::new();
    for route in ROUTES {
        let (service_index, service) = file
            .service
            .iter()
            .enumerate()
            .find(|(_, s)| s.name() == route.service)
            .expect("every route's service is in the descriptors");
        let method_index = service
            .method
            .iter()
            .position(|m| m.name() == route.method)
            .expect("every route's method is in the descriptors");
        let about = comments
            .get(&[6, service_index as i32, 2, method_index as i32])
            .unwrap_or_default();
        let security = match route.service {
            "QuotaService" => "the quota token (`quota_token`), when one is configured",
            _ => "the admin token",
        };
        paths.insert(
            route.path(),
            json!({
                "post": {
                    "operationId": format!("{}.{}", route.service, route.method),
                    "tags": [route.service],
                    "summary": first_sentence(about),
                    "description": format!(
                        "{about}\n\nThe gRPC call {}, with its JSON body in the proto3 JSON \
                         mapping. Authorization: {security}, or an account-scoped token whose \
                         abilities allow the call.",
                        route.grpc_path()
                    ).trim().to_owned(),
                    "requestBody": {
                        "required": true,
                        "content": {"application/json": {
                            "schema": reference(route.input),
                            "example": example(route.method),
                        }},
                    },
                    "responses": {
                        "200": {
                            "description": format!("a {}", route.output),
                            "content": {"application/json": {"schema": reference(route.output)}},
                        },
                        "default": {
                            "description": "an error: the gRPC status as JSON, with the HTTP \
                                            status Google's API design maps its code to",
                            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
                        },
                    },
                },
            }),
        );
    }

    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "quotad",
            "version": env!("CARGO_PKG_VERSION"),
            "description": format!(
                "The JSON door to quotad's QuotaService and AdminService: every gRPC call as \
                 POST /v1/{{Service}}/{{Method}}, on the gRPC port, with the same credentials \
                 and answers. This document is served at {OPENAPI_PATH}."
            ),
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "The quota token, the admin token, or an account-scoped token \
                                    (AdminService.MintAccountToken).",
                },
            },
        },
        "security": [{"bearer": []}, {}],
    })
}

/// A request body for each call, as a caller would send it.
pub fn example(method: &str) -> Value {
    let usage = json!({ "model": "gpt-5.5", "inputTokens": "40000", "outputTokens": "5000" });
    let top_up = json!({
        "accountId": "acct-42", "enabled": true, "thresholdMicros": "5000000",
        "targetMicros": "20000000", "monthlyCapMicros": "0"
    });
    match method {
        "Reserve" => json!({
            "accountId": "acct-42", "requestId": "task-7f3a", "product": "codex",
            "estimate": usage
        }),
        "Commit" => json!({
            "accountId": "acct-42", "reservationId": "rsv_0123456789abcdef0123456789abcdef",
            "usage": usage, "final": true
        }),
        "Release" => json!({
            "accountId": "acct-42", "reservationId": "rsv_0123456789abcdef0123456789abcdef"
        }),
        "GetUsage" => json!({ "accountId": "acct-42", "recentLimit": 20 }),
        "UpsertAccount" => json!({
            "account": { "accountId": "acct-42", "plan": "plus", "creditPurchaseAllowed": true }
        }),
        "GetAccount" => json!({ "accountId": "acct-42" }),
        "GrantCredits" => json!({
            "accountId": "acct-42", "grantId": "order-1001", "amountMicros": "2500000000",
            "source": "purchase"
        }),
        "RevokeGrant" => json!({ "accountId": "acct-42", "grantId": "order-1001" }),
        "SetAutoTopUp" | "PreviewAutoTopUp" => top_up,
        "MintAccountToken" => json!({
            "accountId": "acct-42", "abilities": ["read_usage", "change_top_up"],
            "ttlSeconds": 3600
        }),
        "ReadUsageExport" => json!({
            "group": "billing", "consumer": "billing-1", "maxEvents": 100, "claimIdleMs": "60000"
        }),
        "AckUsageExport" => json!({ "group": "billing", "deliveryIds": ["1-0"] }),
        _ => json!({}),
    }
}

fn reference(full_name: &str) -> Value {
    json!({ "$ref": format!("#/components/schemas/{full_name}") })
}

fn message_schemas(
    message: &DescriptorProto,
    scope: &str,
    location: &[i32],
    comments: &Comments,
    schemas: &mut Map<String, Value>,
) {
    let full_name = format!("{scope}.{}", message.name());
    let mut properties = Map::new();
    for (index, field) in message.field.iter().enumerate() {
        let mut at = location.to_vec();
        at.extend([2, index as i32]);
        let mut schema = field_schema(field);
        if let (Some(about), Some(object)) = (comments.get(&at), schema.as_object_mut()) {
            object.insert("description".into(), about.into());
        }
        properties.insert(field.json_name().to_owned(), schema);
    }
    let mut schema = json!({
        "type": "object",
        "properties": properties,
        // No field is required: on the way in a missing field is its default.
        "additionalProperties": false,
    });
    if let Some(about) = comments.get(location) {
        schema["description"] = about.into();
    }
    schemas.insert(full_name.clone(), schema);
    for (index, nested) in message.nested_type.iter().enumerate() {
        let mut at = location.to_vec();
        at.extend([3, index as i32]);
        message_schemas(nested, &full_name, &at, comments, schemas);
    }
    for (index, kind) in message.enum_type.iter().enumerate() {
        let mut at = location.to_vec();
        at.extend([4, index as i32]);
        schemas.insert(
            format!("{full_name}.{}", kind.name()),
            enum_schema(kind, comments.get(&at)),
        );
    }
}

fn enum_schema(kind: &EnumDescriptorProto, about: Option<&str>) -> Value {
    let names: Vec<&str> = kind.value.iter().map(|v| v.name()).collect();
    let mut schema = json!({ "type": "string", "enum": names });
    if let Some(about) = about {
        schema["description"] = about.into();
    }
    schema
}

fn field_schema(field: &prost_types::FieldDescriptorProto) -> Value {
    let one = match field.r#type() {
        Type::Double | Type::Float => json!({ "type": "number" }),
        Type::Int64 | Type::Sint64 | Type::Sfixed64 => json!({
            "type": "string",
            "pattern": "^-?[0-9]+$",
            "description": "a 64-bit integer as a decimal string (a JSON number is accepted too)",
        }),
        Type::Uint64 | Type::Fixed64 => json!({
            "type": "string",
            "pattern": "^[0-9]+$",
            "description": "an unsigned 64-bit integer as a decimal string (a JSON number is accepted too)",
        }),
        Type::Int32 | Type::Sint32 | Type::Sfixed32 => json!({
            "type": "integer",
            "minimum": i32::MIN,
            "maximum": i32::MAX,
        }),
        Type::Uint32 | Type::Fixed32 => json!({
            "type": "integer",
            "minimum": 0,
            "maximum": u32::MAX,
        }),
        Type::Bool => json!({ "type": "boolean" }),
        Type::String => json!({ "type": "string" }),
        Type::Bytes => json!({ "type": "string", "contentEncoding": "base64" }),
        Type::Enum | Type::Message | Type::Group => {
            let name = field.type_name().trim_start_matches('.');
            match name {
                "google.protobuf.Timestamp" => json!({
                    "type": "string",
                    "format": "date-time",
                    "description": "an RFC 3339 instant in UTC",
                }),
                _ => reference(name),
            }
        }
    };
    if field.label() == Label::Repeated {
        json!({ "type": "array", "items": one })
    } else {
        one
    }
}

fn error_schema() -> Value {
    let codes: Vec<&str> = (0..=16)
        .map(|code| code_name(tonic::Code::from_i32(code)))
        .collect();
    json!({
        "type": "object",
        "description": "Why a call failed. A deny is not an error: it is a 200 answer with \
                        decision DENY.",
        "properties": {
            "code": { "type": "string", "enum": codes, "description": "the gRPC status code's name" },
            "message": { "type": "string", "description": "what went wrong and, for bad input, the allowed values" },
            "field": { "type": "string", "description": "the request field the error is about, when there is one" },
        },
        "required": ["code", "message"],
        "additionalProperties": false,
    })
}

/// The comments of `proto/`, by descriptor location path.
struct Comments(HashMap<Vec<i32>, String>);

impl Comments {
    fn of(file: &FileDescriptorProto) -> Comments {
        let mut comments = HashMap::new();
        for location in file.source_code_info.iter().flat_map(|info| &info.location) {
            let text = location
                .leading_comments()
                .lines()
                .chain(location.trailing_comments().lines())
                .map(str::trim)
                .filter(|line| !line.is_empty())
                .collect::<Vec<_>>()
                .join(" ");
            if !text.is_empty() {
                comments.insert(location.path.clone(), text);
            }
        }
        Comments(comments)
    }

    fn get(&self, path: &[i32]) -> Option<&str> {
        self.0.get(path).map(String::as_str)
    }
}

fn first_sentence(text: &str) -> String {
    match text.find(". ") {
        Some(end) => text[..=end].to_owned(),
        None => text.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_document_lists_every_route_and_every_reference_resolves() {
        let document = build();
        assert_eq!(document["openapi"], "3.1.0");
        let paths = document["paths"].as_object().unwrap();
        assert_eq!(paths.len(), ROUTES.len());
        let schemas = document["components"]["schemas"].as_object().unwrap();
        let text = document.to_string();
        for piece in text.split("\"$ref\":\"#/components/schemas/").skip(1) {
            let name = &piece[..piece.find('"').unwrap()];
            assert!(
                schemas.contains_key(name),
                "{name} is referenced but not defined"
            );
        }
        for route in ROUTES {
            let body = example(route.method).to_string();
            assert!(
                super::super::json::route(&route.path()).is_some_and(|r| r.parses(body.as_bytes())),
                "{}'s example is not a {}: {body}",
                route.method,
                route.input
            );
            assert_ne!(body, "{}", "{} has an example", route.method);
        }
        let reserve = &schemas["quota.v1.ReserveRequest"]["properties"];
        assert_eq!(reserve["accountId"]["type"], "string");
        assert_eq!(schemas["quota.v1.Decision"]["type"], "string");
    }
}
