{{/* Release fullname: the release name when it already holds the chart name. */}}
{{- define "obsrv.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "obsrv.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "obsrv.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: obsrv
{{- end -}}

{{- define "obsrv.selectorLabels" -}}
app.kubernetes.io/name: obsrv-operator
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "obsrv.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "obsrv.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* Leader election: forced on, or implied by more than one replica. */}}
{{- define "obsrv.leaderElection" -}}
{{- if or .Values.leaderElection.enabled (gt (int .Values.replicas) 1) -}}true{{- else -}}false{{- end -}}
{{- end -}}

{{- define "obsrv.operatorImage" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "obsrv.connectorImage" -}}
{{- printf "%s:%s" .Values.connectorImage.repository (default .Chart.AppVersion .Values.connectorImage.tag) -}}
{{- end -}}

{{/*
The operator's declared RBAC needs (files/rbac-rules.json is the output of
`obsrv-operator print-rbac`; scripts/check_chart.py fails when they differ), split by scope:
  cluster    - cluster-scoped resources (CRDs): always a ClusterRole;
  lease      - coordination.k8s.io leases: a Role in the release namespace (leader election);
  namespaced - everything else: a ClusterRole, or a Role per watched namespace.
Each returns a JSON object {"rules": [...]} (Helm's fromJson needs an object).
*/}}
{{- define "obsrv.rbacRules" -}}
{{- $scope := .scope -}}
{{- $clusterScoped := list "customresourcedefinitions" "namespaces" "nodes" "persistentvolumes" "clusterroles" "clusterrolebindings" "storageclasses" "priorityclasses" -}}
{{- $out := list -}}
{{- range (.root.Files.Get "files/rbac-rules.json" | fromJsonArray) -}}
{{- $isCluster := false -}}
{{- range .resources -}}
{{- if has (splitList "/" . | first) $clusterScoped -}}{{- $isCluster = true -}}{{- end -}}
{{- end -}}
{{- $isLease := has "coordination.k8s.io" .apiGroups -}}
{{- if and (eq $scope "cluster") $isCluster -}}
{{- $out = append $out . -}}
{{- else if and (eq $scope "lease") $isLease (not $isCluster) -}}
{{- $out = append $out . -}}
{{- else if and (eq $scope "namespaced") (not $isLease) (not $isCluster) -}}
{{- $out = append $out . -}}
{{- end -}}
{{- end -}}
{{- dict "rules" $out | toJson -}}
{{- end -}}
