//! The events that travel through the pipeline, and the rules an order must follow.
//!
//! Each event carries the whole order forward plus what its stage added, so a consumer
//! never has to look anything up, and `acceptedAt` (epoch ms: when kop-order accepted the
//! request) lets every stage measure end-to-end latency.
//!
//! Unknown fields are tolerated in events (a newer producer may add some); the API is
//! stricter and rejects them at the door.

use serde::{Deserialize, Serialize};

/// An order as the API receives it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Order {
    pub order_id: String,
    pub amount: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub currency: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub customer_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub items: Option<Vec<Item>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Item {
    pub sku: String,
    pub qty: u32,
}

/// A rule an order broke: which field, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct Violation {
    pub field: String,
    pub message: String,
}

fn violation(field: impl Into<String>, message: impl Into<String>) -> Violation {
    Violation {
        field: field.into(),
        message: message.into(),
    }
}

pub const MAX_ORDER_ID_LEN: usize = 128;
pub const MAX_TEXT_LEN: usize = 256;
pub const MAX_ITEMS: usize = 1000;

impl Order {
    /// Checks what types alone cannot; the same rules hold at the API and in every stage, so
    /// a record written by something else than kop-order is judged alike.
    pub fn validate(&self) -> Result<(), Violation> {
        let id = &self.order_id;
        if id.is_empty() || id.len() > MAX_ORDER_ID_LEN {
            return Err(violation("orderId", "must be 1 to 128 characters"));
        }
        if !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
        {
            return Err(violation("orderId", "may only contain A-Z a-z 0-9 . _ : -"));
        }
        if !self.amount.is_finite() || self.amount <= 0.0 {
            return Err(violation(
                "amount",
                "must be a finite number greater than 0",
            ));
        }
        if let Some(currency) = &self.currency
            && (currency.len() != 3 || !currency.bytes().all(|b| b.is_ascii_alphabetic()))
        {
            return Err(violation("currency", "must be 3 letters (ISO 4217)"));
        }
        if let Some(customer) = &self.customer_id
            && (customer.is_empty() || customer.len() > MAX_TEXT_LEN)
        {
            return Err(violation("customerId", "must be 1 to 256 characters"));
        }
        if let Some(items) = &self.items {
            if items.len() > MAX_ITEMS {
                return Err(violation("items", "at most 1000 items"));
            }
            for (i, item) in items.iter().enumerate() {
                if item.sku.is_empty() || item.sku.len() > MAX_TEXT_LEN {
                    return Err(violation(
                        format!("items[{i}].sku"),
                        "must be 1 to 256 characters",
                    ));
                }
                if item.qty < 1 {
                    return Err(violation(format!("items[{i}].qty"), "must be at least 1"));
                }
            }
        }
        Ok(())
    }
}

/// `orders.created`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OrderCreated {
    #[serde(flatten)]
    pub order: Order,
    pub accepted_at: u64,
}

/// `payments.completed`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PaymentCompleted {
    #[serde(flatten)]
    pub order: Order,
    pub accepted_at: u64,
    pub payment_id: String,
    pub paid_at: u64,
}

/// `inventory.reserved`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InventoryReserved {
    #[serde(flatten)]
    pub order: Order,
    pub accepted_at: u64,
    pub payment_id: String,
    pub reservation_id: String,
    pub reserved_at: u64,
}

/// Milliseconds since the Unix epoch, the unit of Kafka timestamps and of `x-retry-at`.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order(id: &str, amount: f64) -> Order {
        Order {
            order_id: id.into(),
            amount,
            currency: None,
            customer_id: None,
            items: None,
        }
    }

    #[test]
    fn rules() {
        assert!(order("o1", 42.0).validate().is_ok());
        assert_eq!(order("", 1.0).validate().unwrap_err().field, "orderId");
        assert_eq!(order("a b", 1.0).validate().unwrap_err().field, "orderId");
        assert_eq!(
            order(&"x".repeat(129), 1.0).validate().unwrap_err().field,
            "orderId"
        );
        assert_eq!(order("o", 0.0).validate().unwrap_err().field, "amount");
        assert_eq!(order("o", f64::NAN).validate().unwrap_err().field, "amount");
        let mut o = order("o", 1.0);
        o.currency = Some("EURO".into());
        assert_eq!(o.validate().unwrap_err().field, "currency");
        o.currency = Some("EUR".into());
        o.items = Some(vec![Item {
            sku: "s".into(),
            qty: 0,
        }]);
        assert_eq!(o.validate().unwrap_err().field, "items[0].qty");
    }

    #[test]
    fn events_keep_the_order_fields_flat() {
        let e = OrderCreated {
            order: order("o1", 42.0),
            accepted_at: 7,
        };
        let json = serde_json::to_string(&e).unwrap();
        assert_eq!(json, r#"{"orderId":"o1","amount":42.0,"acceptedAt":7}"#);
        assert_eq!(serde_json::from_str::<OrderCreated>(&json).unwrap(), e);
    }
}
