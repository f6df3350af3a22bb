//! The business rules of the three stages. Each is a pure function of the consumed event:
//! decoding or schema errors are permanent (straight to the DLQ), and the rest of the
//! machinery — retries, transactions, concurrency — lives in [`crate::stage`].

use crate::event::{InventoryReserved, OrderCreated, PaymentCompleted, now_ms};
use crate::retry::HandlerError;
use crate::stage::{Handled, Handler, Inbound, decode};

fn schema(e: crate::event::Violation) -> HandlerError {
    HandlerError::permanent(format!("schema violation: {e}"))
}

fn encode<T: serde::Serialize>(event: &T) -> Result<Vec<u8>, HandlerError> {
    serde_json::to_vec(event)
        .map_err(|e| HandlerError::permanent(format!("cannot encode the event: {e}")))
}

/// kop-payment: charges the order.
pub struct Payment;

impl Handler for Payment {
    fn stage(&self) -> &'static str {
        "payment"
    }

    fn handle(&self, record: &Inbound) -> Result<Handled, HandlerError> {
        let created: OrderCreated = decode(record)?;
        created.order.validate().map_err(schema)?;
        // Derived from the order id, so a payment handled twice has one identity.
        let payment_id = format!("pay-{}", created.order.order_id);
        let event = PaymentCompleted {
            payment_id,
            accepted_at: created.accepted_at,
            paid_at: now_ms(),
            order: created.order,
        };
        Ok(Handled {
            output: Some(encode(&event)?),
            order_id: event.order.order_id,
            accepted_at_ms: event.accepted_at,
        })
    }
}

/// kop-inventory: reserves the items of a paid order.
pub struct Inventory;

impl Handler for Inventory {
    fn stage(&self) -> &'static str {
        "inventory"
    }

    fn handle(&self, record: &Inbound) -> Result<Handled, HandlerError> {
        let paid: PaymentCompleted = decode(record)?;
        paid.order.validate().map_err(schema)?;
        if paid.payment_id.is_empty() {
            return Err(HandlerError::permanent(
                "schema violation: paymentId is empty",
            ));
        }
        let event = InventoryReserved {
            reservation_id: format!("res-{}", paid.order.order_id),
            payment_id: paid.payment_id,
            accepted_at: paid.accepted_at,
            reserved_at: now_ms(),
            order: paid.order,
        };
        Ok(Handled {
            output: Some(encode(&event)?),
            order_id: event.order.order_id,
            accepted_at_ms: event.accepted_at,
        })
    }
}

/// kop-notification: tells the customer; the last stage, it produces nothing.
pub struct Notification;

impl Handler for Notification {
    fn stage(&self) -> &'static str {
        "notification"
    }

    fn handle(&self, record: &Inbound) -> Result<Handled, HandlerError> {
        let reserved: InventoryReserved = decode(record)?;
        reserved.order.validate().map_err(schema)?;
        if reserved.reservation_id.is_empty() {
            return Err(HandlerError::permanent(
                "schema violation: reservationId is empty",
            ));
        }
        Ok(Handled {
            order_id: reserved.order.order_id,
            accepted_at_ms: reserved.accepted_at,
            output: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::retry::ErrorClass;

    fn record(payload: &[u8]) -> Inbound {
        Inbound {
            topic: "t".into(),
            partition: 0,
            offset: 0,
            key: Some(b"o1".to_vec()),
            payload: Some(payload.to_vec()),
            headers: None,
        }
    }

    #[test]
    fn an_order_flows_through_all_three_rules() {
        let paid = Payment
            .handle(&record(br#"{"orderId":"o1","amount":42,"acceptedAt":5}"#))
            .unwrap();
        assert_eq!(paid.order_id, "o1");
        let reserved = Inventory.handle(&record(&paid.output.unwrap())).unwrap();
        let notified = Notification
            .handle(&record(&reserved.output.unwrap()))
            .unwrap();
        assert_eq!(notified.output, None);
        assert_eq!(notified.accepted_at_ms, 5);
    }

    #[test]
    fn poison_is_permanent() {
        for payload in [
            &b"not json"[..],
            br#"{"orderId":1}"#,
            br#"{"orderId":"o1","amount":-3,"acceptedAt":1}"#,
        ] {
            let err = Payment.handle(&record(payload)).unwrap_err();
            assert_eq!(err.class, ErrorClass::Permanent, "{}", err.message);
        }
        let err = Inventory
            .handle(&record(br#"{"orderId":"o1","amount":42,"acceptedAt":5}"#))
            .unwrap_err();
        assert_eq!(err.class, ErrorClass::Permanent);
    }
}
