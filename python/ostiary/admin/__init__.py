"""The admin HTTP API and its web page: approvals for approvers and automation."""
